"""Epoch checkpoints on the wire and on disk: the pool committees are drawn from.

``EpochService`` drives ``protocols.epochs`` for one peer:

* serves ``/edgeswarm/epochs/1``: ``get`` (certified checkpoints after an epoch),
  ``stand`` (is this peer live and standing for the pool: serving peers do,
  bootstrap nodes and one-shot clients do not; a standing peer also names the
  model cids it serves, which the checkpoint records for referee panels) and
  ``propose`` (a checkpoint committee member's vote, persisted before it is sent: one per epoch);
* at each epoch, if this peer sits on the checkpoint committee of the newest
  checkpoint, proposes the next one (members in committee order take turns, so a
  dead first member delays the checkpoint, it does not stop it): asks the live
  candidates (connected peers and the previous members) whether they stand, lists
  the eligible ones, collects a quorum of votes, keeps and stores the result;
* pulls newer checkpoints from a connected peer every ``sync_interval``.

Checkpoints live in ``<network dir>/epochs/<epoch>.cbor``, this peer's votes in
``<network dir>/epochs/votes/<epoch>`` (both written atomically and fsync'd).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import nacl.signing
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from peer.caps import guarded
from peer.host import retire_stream_handler
from peer.ledger_store import LedgerSnapshot
from peer.settlement.base import LedgerFacts
from peer.settlement.budget import PeerBudget
from peer.settlement_paths import GENESIS_FILE, NetworkError, read_genesis_file, write_atomic
from protocols.codec import FrameDecoder, frame
from protocols.epochs import (
    MAX_GET,
    MAX_REPLY,
    MAX_REQUEST,
    MAX_STAND_REPLY,
    CertifiedCheckpoint,
    CheckpointVoter,
    EpochRules,
    GetCheckpoints,
    Offer,
    PoolCheckpoint,
    PoolVote,
    Propose,
    Stand,
    certify_checkpoint,
    decode_checkpoints,
    decode_request,
    decode_stand_reply,
    decode_vote_reply,
    encode_checkpoints,
    encode_request,
    encode_stand,
    encode_vote_reply,
    ledger_eligibility,
    propose_members,
    propose_models,
    rules_from,
)
from protocols.errors import ProtocolError
from protocols.genesis import Genesis
from protocols.identity import peer_id_from_public_key
from protocols.signed import Signed

log = logging.getLogger(__name__)

EPOCHS_PROTOCOL = TProtocol("/edgeswarm/epochs/1")
ASK_TIMEOUT = 3.0  # one request to one peer
MAX_CANDIDATES = 256  # peers asked whether they stand, per proposal
MAX_SYNC_ROUNDS = 64  # get rounds per sync (x MAX_GET checkpoints)
MAX_STORED_VOTES = 4096
# Requests one peer may make of us: a get reply can be ~1 MB of checkpoints, a proposal
# costs a ledger walk. Honest use is a few per epoch and one get per sync interval.
REQUESTS_PER_S = 20.0
REQUESTS_BURST = 100


# --- files ------------------------------------------------------------------------------------


class EpochFiles:
    """Certified checkpoints and this peer's checkpoint votes under one network dir."""

    def __init__(self, network_dir: Path) -> None:
        self.dir = Path(network_dir) / "epochs"
        self.votes_dir = self.dir / "votes"

    def _ensure(self) -> None:
        self.votes_dir.mkdir(parents=True, exist_ok=True)

    def load_into(self, rules: EpochRules) -> int:
        """Add every stored checkpoint that verifies, in epoch order; returns how many."""
        if not self.dir.is_dir():
            return 0
        epochs = sorted(int(p.stem) for p in self.dir.glob("*.cbor") if p.stem.isdigit())
        added = 0
        for e in epochs:
            try:
                data = (self.dir / f"{e}.cbor").read_bytes()
                added += rules.add(CertifiedCheckpoint.from_bytes(data))
            except (OSError, ProtocolError) as exc:
                log.warning("stored checkpoint %d skipped: %s", e, exc)
        return added

    def save(self, certified: CertifiedCheckpoint) -> None:
        self._ensure()
        write_atomic(self.dir / f"{certified.epoch}.cbor", certified.to_bytes())

    def votes(self) -> dict[int, bytes]:
        if not self.votes_dir.is_dir():
            return {}
        out = {}
        for p in self.votes_dir.iterdir():
            if p.name.isdigit():
                data = p.read_bytes()
                if len(data) == 32:
                    out[int(p.name)] = data
        return out

    def save_vote(self, epoch: int, digest: bytes) -> None:
        self._ensure()
        write_atomic(self.votes_dir / str(epoch), digest)
        # Old votes can never matter again once far behind; keep the directory bounded.
        names = sorted(int(p.name) for p in self.votes_dir.iterdir() if p.name.isdigit())
        for old in names[:-MAX_STORED_VOTES]:
            (self.votes_dir / str(old)).unlink(missing_ok=True)


def epoch_rules(genesis: Genesis, network_dir: Path | None) -> EpochRules:
    """The network's committee rule, following the epoch checkpoints stored under
    ``network_dir`` (none: the genesis rule until checkpoints arrive)."""
    rules = rules_from(
        genesis.rule(),
        network=genesis.digest,
        epoch_ms=genesis.epoch_ms,
        lag=genesis.beacon_lag,
        age=genesis.eligible_age,
    )
    if network_dir is not None:
        EpochFiles(network_dir).load_into(rules)
    rules.tick(int(time.time() * 1000))
    return rules


def with_epoch_rules(snap: LedgerSnapshot, network_dir: Path) -> LedgerSnapshot:
    """``snap`` with its rule following the checkpoints stored beside it (when the
    network's genesis is there too), so certificates cast under them verify."""
    genesis_path = Path(network_dir) / GENESIS_FILE
    if snap.rule is None or not genesis_path.exists():
        return snap
    try:
        genesis = read_genesis_file(genesis_path)
    except NetworkError:
        return snap
    return dataclasses.replace(snap, rule=epoch_rules(genesis, network_dir))


# --- one request, one reply -----------------------------------------------------------------


async def _read_frame(stream: INetStream, max_size: int) -> bytes | None:
    decoder = FrameDecoder(max_size=max_size)
    for _ in range(max_size + 16):  # bounded: every read brings at least one byte
        data = decoder.next_frame()
        if data is not None:
            return data
        chunk = await stream.read(65536)
        if not chunk:
            return None
        decoder.feed(chunk)
    return None


async def ask(host: IHost, peer_id: str, request: bytes, max_reply: int) -> bytes:
    """Send one request to ``peer_id`` on /edgeswarm/epochs/1 and return the reply frame
    (raises ``trio.TooSlowError``, ``ProtocolError`` or the transport's errors)."""
    with trio.fail_after(ASK_TIMEOUT):
        stream = await host.new_stream(ID.from_base58(peer_id), [EPOCHS_PROTOCOL])
        try:
            await stream.write(frame(request, max_size=MAX_REQUEST))
            reply = await _read_frame(stream, max_reply)
            if reply is None:
                raise ConnectionError(f"{peer_id[-8:]} closed the epochs stream")
            return reply
        finally:
            with trio.move_on_after(1):
                await stream.close()


class EpochService:
    """One peer's part in the epoch checkpoints (see the module docstring)."""

    def __init__(
        self,
        host: IHost,
        key: nacl.signing.SigningKey,
        facts: LedgerFacts,
        rules: EpochRules,
        files: EpochFiles,
        *,
        min_earned: int,
        stand: bool,
        sync_interval: float,
        clock: Callable[[], float] = time.time,
        models: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.host = host
        self.peer_id = peer_id_from_public_key(bytes(key.verify_key))
        self.facts = facts
        self.rules = rules
        self.files = files
        self.min_earned = min_earned
        self.stand = stand
        self.models = models  # the model cids this peer serves now (named when it stands)
        self.sync_interval = sync_interval
        self.clock = clock
        self.voter = CheckpointVoter(key, files.votes())
        self._vote_lock = trio.Lock()
        self._proposed: set[int] = set()  # epochs we proposed for (once each)
        self.budget = PeerBudget(REQUESTS_PER_S, REQUESTS_BURST)
        self.changed = trio.Event()  # set (and replaced) whenever a checkpoint is added

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def tick(self) -> None:
        self.rules.tick(self.now_ms())

    # --- keeping checkpoints --------------------------------------------------------------

    async def keep(self, certified: CertifiedCheckpoint) -> bool:
        """Verify, keep and store one certified checkpoint (True if new)."""
        if not self.rules.add(certified):
            return False
        await trio.to_thread.run_sync(self.files.save, certified)
        c = certified.checkpoint
        log.info(
            "epoch checkpoint %d: %d members, pool of %d",
            c.epoch,
            len(c.members),
            len(c.pool(self.rules.age)),
        )
        self.tick()
        self.changed.set()
        self.changed = trio.Event()
        return True

    async def sync_with(self, peer_id: str) -> int:
        """Pull the checkpoints ``peer_id`` has after our newest; returns how many were new."""
        added = 0
        for _ in range(MAX_SYNC_ROUNDS):
            latest = self.rules.latest
            after = latest.epoch if latest is not None else 0
            reply = await ask(self.host, peer_id, encode_request(GetCheckpoints(after)), MAX_REPLY)
            items = decode_checkpoints(reply)
            for item in items:
                added += await self.keep(item)
            if len(items) < MAX_GET:
                break
        return added

    async def sync_some(self, limit: int = 8) -> int:
        """Pull from up to ``limit`` connected peers (errors are logged, not raised)."""
        peers = [str(p) for p in self.host.get_connected_peers()]
        random.shuffle(peers)
        added = 0
        for peer_id in peers[:limit]:
            try:
                added += await self.sync_with(peer_id)
            except (ProtocolError, trio.TooSlowError) as exc:
                log.debug("checkpoint sync with %s failed: %s", peer_id[-8:], exc)
            except Exception as exc:  # a peer without the protocol, a dropped stream
                log.debug("checkpoint sync with %s failed: %r", peer_id[-8:], exc)
        return added

    # --- serving --------------------------------------------------------------------------

    async def answer(self, data: bytes) -> bytes:
        request = decode_request(data)
        if isinstance(request, GetCheckpoints):
            return encode_checkpoints(self.rules.after(request.after, MAX_GET))
        if isinstance(request, Stand):
            return encode_stand(self.stand, self._served())
        if isinstance(request, Offer):
            await self.keep(request.certified)
            return encode_stand(True)
        assert isinstance(request, Propose)
        if request.prev is not None and self.rules.get(request.prev.epoch) is None:
            try:
                await self.keep(request.prev)  # verified like any other
            except ProtocolError as exc:
                return encode_vote_reply(f"cannot take the previous checkpoint: {exc}")
        return encode_vote_reply(await self.vote(request.checkpoint))

    async def vote(self, proposal: PoolCheckpoint) -> Signed[PoolVote] | str:
        """Our vote for ``proposal`` (persisted first), or why not."""
        async with self._vote_lock:
            now = self.now_ms()
            view = ledger_eligibility(self.facts.ledger, now, self.min_earned)
            before = self.voter.voted.get(proposal.epoch)
            answer = self.voter.decide(proposal, self.rules, self.rules.epoch_of(now), view)
            if not isinstance(answer, str) and before is None:
                try:
                    await trio.to_thread.run_sync(
                        self.files.save_vote, proposal.epoch, proposal.digest
                    )
                except OSError as exc:
                    self.voter.voted.pop(proposal.epoch, None)
                    return f"cannot store the vote: {exc}"
            return answer

    async def handle_stream(self, stream: INetStream) -> None:
        try:
            remote = str(stream.muxed_conn.peer_id)
            if not self.budget.take(remote):
                log.debug("epochs request of %s refused: over its budget", remote[-8:])
                return  # closed unanswered (before anything is read or parsed)
            with trio.fail_after(ASK_TIMEOUT * 2):
                data = await _read_frame(stream, MAX_REQUEST)
                if data is not None:
                    reply = await self.answer(data)
                    await stream.write(frame(reply, max_size=MAX_REPLY))
        except (ProtocolError, trio.TooSlowError) as exc:
            log.debug("epochs request refused: %s", exc)
        except Exception as exc:  # a vanished asker
            log.debug("epochs stream failed: %r", exc)
        finally:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    log.debug("closing an epochs stream failed", exc_info=True)

    # --- proposing ------------------------------------------------------------------------

    def _served(self) -> tuple[str, ...]:
        try:
            return tuple(self.models()) if self.stand else ()
        except Exception as exc:  # a registry being changed: name none this time
            log.debug("cannot list the served models: %r", exc)
            return ()

    async def _stands(self, peer_id: str) -> tuple[bool, tuple[str, ...]]:
        if peer_id == self.peer_id:
            return self.stand, self._served()
        try:
            reply = await ask(self.host, peer_id, encode_request(Stand()), MAX_STAND_REPLY)
            return decode_stand_reply(reply)
        except Exception as exc:  # unreachable or not a settlement peer: not a candidate
            log.debug("%s does not stand: %r", peer_id[-8:], exc)
            return False, ()

    async def _candidates(self, prev: PoolCheckpoint | None) -> dict[str, tuple[str, ...]]:
        """The live candidates that stand, with the model cids each says it serves."""
        asked = [self.peer_id, *(str(p) for p in self.host.get_connected_peers())]
        if prev is not None:
            asked += [m for m, _ in prev.members]
        asked = list(dict.fromkeys(asked))[:MAX_CANDIDATES]
        live: dict[str, tuple[str, ...]] = {}

        async def check(peer_id: str) -> None:
            stands, models = await self._stands(peer_id)
            if stands:
                live[peer_id] = models

        async with trio.open_nursery() as nursery:
            for peer_id in asked:
                nursery.start_soon(check, peer_id)
        return live

    async def propose(self, epoch: int) -> CertifiedCheckpoint | None:
        """Propose the checkpoint of ``epoch`` and gather votes (None: no quorum)."""
        latest = self.rules.latest
        prev = latest.checkpoint if latest is not None else None
        committee = self.rules.checkpoint_committee(prev.epoch if prev else 0)
        live = await self._candidates(prev)
        view = ledger_eligibility(self.facts.ledger, self.now_ms(), self.min_earned)
        members = propose_members(prev, epoch, live, view)
        proposal = PoolCheckpoint(
            network=self.rules.network,
            epoch=epoch,
            prev_epoch=prev.epoch if prev else 0,
            prev=prev.digest if prev else self.rules.network,
            members=members,
            models=propose_models(members, live),
        )
        votes: dict[str, Signed[PoolVote]] = {}
        refusals: dict[str, str] = {}

        async def ask_vote(member: str) -> None:
            try:
                if member == self.peer_id:
                    answer = await self.vote(proposal)
                else:
                    request = encode_request(Propose(proposal, latest))
                    reply = await ask(self.host, member, request, 1024)
                    answer = decode_vote_reply(reply)
            except Exception as exc:
                refusals[member] = repr(exc)
                return
            if isinstance(answer, str):
                refusals[member] = answer
                return
            v = answer.message
            if v.witness == member and (v.epoch, v.checkpoint) == (epoch, proposal.digest):
                votes[member] = answer

        async with trio.open_nursery() as nursery:
            for member in committee.members:
                nursery.start_soon(ask_vote, member)
        if len(votes) < committee.quorum:
            log.info(
                "checkpoint %d: %d of %d votes (quorum %d): %s",
                epoch,
                len(votes),
                committee.size,
                committee.quorum,
                "; ".join(f"{m[-8:]}: {why[:80]}" for m, why in refusals.items()),
            )
            return None
        chosen = sorted(votes)[: committee.quorum]
        certified = certify_checkpoint(proposal, (votes[m] for m in chosen))
        await self.keep(certified)
        await self.offer(certified, [*committee.members, *live])
        return certified

    async def offer(self, certified: CertifiedCheckpoint, also: list[str]) -> None:
        """Hand a new checkpoint to the next committee, the candidates and connected peers
        at once (they would pull it within ``sync_interval`` anyway)."""
        request = encode_request(Offer(certified))
        targets = [*also, *(str(p) for p in self.host.get_connected_peers())]
        targets = [t for t in dict.fromkeys(targets) if t != self.peer_id][:MAX_CANDIDATES]

        async def send(peer_id: str) -> None:
            try:
                await ask(self.host, peer_id, request, 64)
            except Exception as exc:
                log.debug("offering checkpoint %d to %s failed: %r", certified.epoch, peer_id, exc)

        async with trio.open_nursery() as nursery:
            for peer_id in targets:
                nursery.start_soon(send, peer_id)

    def _my_turn(self, now_ms: int) -> bool:
        """Whether to propose now: this epoch has no checkpoint yet, we sit on the
        checkpoint committee, and the members before us had their turn."""
        epoch = self.rules.epoch_of(now_ms)
        latest = self.rules.latest
        if epoch in self._proposed or (latest is not None and latest.epoch >= epoch):
            return False
        if epoch in self.voter.voted:  # we already back another member's proposal
            return False
        committee = self.rules.checkpoint_committee(latest.epoch if latest else 0)
        if self.peer_id not in committee:
            return False
        rank = committee.members.index(self.peer_id)
        slot = self.rules.epoch_ms / (committee.size + 1)
        return now_ms - epoch * self.rules.epoch_ms >= rank * slot

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.tick()
        self.host.set_stream_handler(
            EPOCHS_PROTOCOL, guarded(self.host, EPOCHS_PROTOCOL, self.handle_stream)
        )
        try:
            with trio.move_on_after(ASK_TIMEOUT * 2):
                await self.sync_some()
            task_status.started()
            step = max(0.05, min(self.rules.epoch_ms / 8000, 1.0))
            next_sync = 0.0
            while True:  # until cancelled: one step per tick
                self.tick()
                now = self.now_ms()
                if self.sync_interval > 0 and time.monotonic() >= next_sync:
                    await self.sync_some(limit=2)
                    next_sync = time.monotonic() + self.sync_interval * random.uniform(0.5, 1.0)
                if self._my_turn(now):
                    epoch = self.rules.epoch_of(now)
                    self._proposed = {e for e in self._proposed if e > epoch - 8} | {epoch}
                    try:
                        await self.propose(epoch)
                    except ProtocolError as exc:
                        log.info("checkpoint %d not proposed: %s", epoch, exc)
                await trio.sleep(step)
        finally:
            try:
                retire_stream_handler(self.host, EPOCHS_PROTOCOL)
            except Exception:
                log.debug("retiring the epochs handler failed", exc_info=True)

"""peer/settlement/epochs.py without a network: votes are durable before they are sent,
checkpoints reload along their chain, a proposal carries the checkpoint it extends."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from settlement_helpers import key, pid, policy

import peer.settlement.epochs as epochs_io
from peer.settlement.budget import PeerBudget
from peer.settlement.epochs import REQUESTS_BURST, REQUESTS_PER_S, EpochFiles, EpochService
from protocols.codec import frame
from protocols.committee import CommitteeRule
from protocols.epochs import (
    CertifiedCheckpoint,
    EpochRules,
    GetCheckpoints,
    PoolCheckpoint,
    Propose,
    Stand,
    certify_checkpoint,
    decode_checkpoints,
    decode_request,
    decode_vote_reply,
    encode_request,
    encode_stand,
    rules_from,
    sign_pool_vote,
)
from protocols.errors import ProtocolError
from protocols.ledger_state import LedgerState

NETWORK = hashlib.sha256(b"net").digest()
GENESIS_KEY = key(960)
GENESIS = pid(GENESIS_KEY)
MEMBERS = [pid(key(970 + i)) for i in range(3)]
NOW = 1_800_000_000.0  # seconds; epoch_ms 1000 -> epoch 1_800_000_000


def new_rules() -> EpochRules:
    return rules_from(
        CommitteeRule(beacon=b"seed", fallback=frozenset({GENESIS}), f=1),
        network=NETWORK,
        epoch_ms=1000,
        lag=2,
        age=1,
    )


def service(
    tmp_path: Path,
    rules: EpochRules | None = None,
    *,
    stand: bool = False,
    models: tuple[str, ...] = (),
) -> EpochService:
    rules = rules or new_rules()
    facts: Any = SimpleNamespace(ledger=LedgerState(rules, policy(genesis=frozenset(MEMBERS))))
    return EpochService(
        None,  # type: ignore[arg-type]  # no network in these tests
        GENESIS_KEY,
        facts,
        rules,
        EpochFiles(tmp_path),
        min_earned=0,
        stand=stand,
        sync_interval=0,
        clock=lambda: NOW,
        models=lambda: models,
    )


def proposal(
    epoch: int, members: list[str], prev: CertifiedCheckpoint | None = None
) -> PoolCheckpoint:
    return PoolCheckpoint(
        NETWORK,
        epoch,
        prev.epoch if prev else 0,
        prev.digest if prev else NETWORK,
        tuple((m, epoch if prev is None else 1) for m in sorted(members)),
    )


def certified(c: PoolCheckpoint) -> CertifiedCheckpoint:
    return certify_checkpoint(c, [sign_pool_vote(GENESIS_KEY, c)])


async def test_a_vote_is_stored_before_it_is_sent_and_binds_after_a_restart(
    tmp_path: Path,
) -> None:
    a, b = proposal(5, MEMBERS[:1]), proposal(5, MEMBERS[1:2])
    svc = service(tmp_path)
    vote = await svc.vote(a)
    assert not isinstance(vote, str) and vote.message.checkpoint == a.digest
    assert EpochFiles(tmp_path).votes() == {5: a.digest}
    restarted = service(tmp_path)  # same data dir, fresh memory
    assert await restarted.vote(b) == "already voted for another checkpoint of epoch 5"
    again = await restarted.vote(a)
    assert not isinstance(again, str)


async def test_checkpoints_reload_in_chain_order_and_a_bad_file_is_skipped(
    tmp_path: Path,
) -> None:
    svc = service(tmp_path)
    first = certified(proposal(3, MEMBERS))
    assert await svc.keep(first)
    rules = svc.rules
    second_c = PoolCheckpoint(NETWORK, 4, 3, first.digest, tuple((m, 3) for m in sorted(MEMBERS)))
    committee = rules.checkpoint_committee(3)
    assert committee.members == (GENESIS,)  # the pool of checkpoint 3 is not aged yet
    second = certified(second_c)
    assert await svc.keep(second)
    fresh = new_rules()
    assert EpochFiles(tmp_path).load_into(fresh) == 2
    assert fresh.epochs() == [3, 4] and fresh.latest == second
    (tmp_path / "epochs" / "3.cbor").write_bytes(b"\xff garbage")
    broken = new_rules()
    assert EpochFiles(tmp_path).load_into(broken) == 0  # 4 extends the lost 3: not taken
    reply = await svc.answer(encode_request(GetCheckpoints(0)))
    assert [c.epoch for c in decode_checkpoints(reply)] == [3, 4]


async def test_a_proposal_brings_the_checkpoint_it_extends_and_a_forged_one_is_refused(
    tmp_path: Path,
) -> None:
    first = certified(proposal(3, MEMBERS))
    nxt = PoolCheckpoint(NETWORK, 4, 3, first.digest, tuple((m, 3) for m in sorted(MEMBERS)))
    svc = service(tmp_path)
    reply = decode_vote_reply(await svc.answer(encode_request(Propose(nxt, first))))
    assert not isinstance(reply, str), reply
    assert svc.rules.latest == first  # verified and kept on the way
    forged_first = certify_checkpoint(
        proposal(3, MEMBERS[:1]), [sign_pool_vote(key(999), proposal(3, MEMBERS[:1]))]
    )
    other = service(tmp_path / "other")
    nxt2 = PoolCheckpoint(NETWORK, 4, 3, forged_first.digest, ())
    reply = decode_vote_reply(await other.answer(encode_request(Propose(nxt2, forged_first))))
    assert isinstance(reply, str) and "cannot take the previous checkpoint" in reply
    assert other.rules.latest is None
    with pytest.raises(ProtocolError):
        decode_request(b"\x00")


class FakeStream:
    """Just enough of a libp2p stream: a remote peer id, bytes in, bytes out."""

    def __init__(self, remote: str, data: bytes) -> None:
        self.muxed_conn = SimpleNamespace(peer_id=remote)
        self._data = data
        self.written = b""

    async def read(self, n: int) -> bytes:
        out, self._data = self._data[:n], self._data[n:]
        return out

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close(self) -> None:
        pass


async def test_a_peer_over_its_request_budget_is_not_answered(tmp_path: Path) -> None:
    svc = service(tmp_path)
    svc.budget = PeerBudget(REQUESTS_PER_S, REQUESTS_BURST, clock=lambda: 0.0)  # no refill
    request = frame(encode_request(GetCheckpoints(0)), max_size=1024)
    answered = 0
    for _ in range(REQUESTS_BURST + 10):
        stream = FakeStream(MEMBERS[0], request)
        await svc.handle_stream(stream)  # type: ignore[arg-type]
        answered += bool(stream.written)
    assert answered == REQUESTS_BURST
    other = FakeStream(MEMBERS[1], request)  # another peer has its own budget
    await svc.handle_stream(other)  # type: ignore[arg-type]
    assert other.written


async def test_a_proposal_records_the_models_its_standing_members_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each candidate names when asked to stand goes into the checkpoint's models
    table (referee panels per model are drawn from it); one that does not stand is out."""
    mine, theirs = hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()
    svc = service(tmp_path, stand=True, models=(mine,))
    assert epochs_io.decode_stand_reply(await svc.answer(encode_request(Stand()))) == (
        True,
        (mine,),
    )
    svc.host = SimpleNamespace(get_connected_peers=lambda: MEMBERS[:2])  # type: ignore[assignment]

    async def fake_ask(host: object, peer_id: str, data: bytes, limit: int) -> bytes:
        if isinstance(decode_request(data), Stand):
            return encode_stand(peer_id == MEMBERS[0], [theirs, mine])
        return encode_stand(True)  # an offer's answer

    monkeypatch.setattr(epochs_io, "ask", fake_ask)
    made = await svc.propose(int(NOW) - 1)
    assert made is not None
    c = made.checkpoint
    assert MEMBERS[0] in c.pool(0) and MEMBERS[1] not in c.pool(0)
    serving = c.serving()
    assert MEMBERS[0] in serving[mine] and MEMBERS[0] in serving[theirs]
    assert (GENESIS in c.pool(0)) == (GENESIS in serving[mine])
    assert GENESIS not in serving[theirs]

"""The witness state machine: lock before reply, one transfer per (account, seq), refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from settlement_fixtures import (
    NOW_MS,
    WITNESS_KEYS,
    World,
    key,
    pid,
    policy,
    receipt,
    transfer,
)
from settlement_fixtures import rule as committee_rule

from protocols.certificate import (
    Certificate,
    CertificateAssembler,
    WitnessVote,
    make_certificate,
    sign_vote,
)
from protocols.committee import CommitteeRule
from protocols.errors import LocalProtocolError, RemoteProtocolError, ValidationError
from protocols.ledger import Transfer
from protocols.ledger_state import LedgerState
from protocols.proofs import EquivocationProof
from protocols.signed import Signed
from protocols.witness import (
    LockRecord,
    PersistLock,
    Refusal,
    Refuse,
    ReplyVote,
    ReportEquivocation,
    TransferRequest,
    Witness,
    decode_reply,
    encode_reply,
)

P, X, Y = key(1), key(2), key(3)
GENESIS = frozenset({pid(P)})


def _world() -> World:
    return World(policy(genesis=GENESIS))


def test_lock_is_persisted_before_the_vote_is_released() -> None:
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    r = receipt(P, X, 10, 1)
    t = transfer(P, r, 1)
    first = w.handle_transfer(t, r, led, NOW_MS)
    assert isinstance(first, PersistLock) and first.record.digest == t.digest
    # Asked again before the store answered: persist again (idempotent), still no vote.
    assert w.handle_transfer(t, r, led, NOW_MS) == first
    reply = w.lock_persisted(first.record)
    assert isinstance(reply, ReplyVote)
    assert reply.vote.message == WitnessVote(pid(P), 1, t.digest, w.peer_id)
    # Once durable, a retry is answered directly.
    assert isinstance(w.handle_transfer(t, r, led, NOW_MS), ReplyVote)


def test_lock_persisted_without_pending_lock_is_a_local_error() -> None:
    world = _world()
    r = receipt(P, X, 10, 1)
    with pytest.raises(LocalProtocolError):
        world.witnesses[0].lock_persisted(LockRecord(transfer(P, r, 1)))


def test_restart_keeps_the_lock_and_catches_equivocation() -> None:
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    ra, rb = receipt(P, X, 10, 1), receipt(P, Y, 10, 2)
    ta, tb = transfer(P, ra, 1), transfer(P, rb, 1)
    action = w.handle_transfer(ta, ra, led, NOW_MS)
    assert isinstance(action, PersistLock)
    stored = action.record.to_bytes()
    w.lock_persisted(action.record)
    restarted = Witness(WITNESS_KEYS[0], durable_locks=[LockRecord.from_bytes(stored)])
    assert isinstance(restarted.handle_transfer(ta, ra, led, NOW_MS), ReplyVote)
    eq = restarted.handle_transfer(tb, rb, led, NOW_MS)
    assert isinstance(eq, ReportEquivocation)
    eq.proof.verify()
    assert eq.proof.offender == pid(P)
    assert EquivocationProof.from_bytes(eq.proof.to_bytes()) == eq.proof


def test_failed_persist_releases_the_pending_lock() -> None:
    world = _world()
    w, led = world.witnesses[0], world.ledgers[0]
    ra, rb = receipt(P, X, 10, 1), receipt(P, Y, 10, 2)
    action = w.handle_transfer(transfer(P, ra, 1), ra, led, NOW_MS)
    assert isinstance(action, PersistLock)
    w.lock_failed(action.record)
    assert isinstance(w.handle_transfer(transfer(P, rb, 1), rb, led, NOW_MS), PersistLock)


def test_certificate_verifies_against_the_committee_only() -> None:
    world = _world()
    r = receipt(P, X, 10, 1)
    cert = world.certify(transfer(P, r, 1), r)
    assert cert is not None
    committee = world.rul.committee_for(pid(P))
    assert committee.quorum == 3 and committee.size == 4
    cert.verify(committee)
    again = Certificate.from_bytes(cert.to_bytes())
    again.verify(committee)
    # Two votes are not a quorum.
    with pytest.raises(ValidationError):
        make_certificate(cert.transfer, cert.votes[:2]).verify(committee)
    # A duplicated vote does not count twice.
    with pytest.raises(ValidationError):
        Certificate(cert.transfer, (cert.votes[0], cert.votes[0], cert.votes[1])).verify(committee)
    # Votes from outsiders do not count.
    outsiders = CommitteeRule(beacon=b"b", fallback=frozenset({pid(key(50 + i)) for i in range(4)}))
    with pytest.raises(ValidationError):
        cert.verify(outsiders.committee_for(pid(P)))


def test_vote_for_another_transfer_is_rejected_by_the_assembler() -> None:
    world = _world()
    ra, rb = receipt(P, X, 10, 1), receipt(P, Y, 10, 2)
    ta, tb = transfer(P, ra, 1), transfer(P, rb, 1)
    asm = CertificateAssembler(ta, world.rul.committee_for(pid(P)))
    with pytest.raises(ValidationError):
        asm.add_vote(sign_vote(WITNESS_KEYS[0], tb))
    assert asm.add_vote(sign_vote(WITNESS_KEYS[0], ta)) is None
    assert len(asm.missing) == 3


def test_refusals() -> None:
    world = _world()
    led, w = world.ledgers[0], world.witnesses[0]
    r = receipt(P, X, 10, 1)
    led.ingest_receipt(r)

    def reason(t: Signed[Transfer], rec: object = r, now: int = NOW_MS) -> Refusal:
        action = w.handle_transfer(t, rec, led, now)  # type: ignore[arg-type]
        assert isinstance(action, Refuse), action
        return action.reason

    assert reason(transfer(P, r, 2)) is Refusal.MISSING_HISTORY
    assert reason(transfer(P, r, 1, time_ms=NOW_MS + 10**6)) is Refusal.CLOCK_SKEW
    other = receipt(P, Y, 10, 2)
    assert reason(transfer(P, r, 1), rec=other) is Refusal.BAD_RECEIPT
    wrong_amount = Transfer(pid(P), pid(X), 11, 1, r.receipt_id, NOW_MS)
    from protocols.ledger import sign_transfer

    assert reason(sign_transfer(P, wrong_amount)) is Refusal.BAD_RECEIPT
    # Pay it once (certified), then paying it again is refused, and seq 1 is stale.
    assert world.certify(transfer(P, r, 1), r) is not None
    assert reason(transfer(P, r, 2)) is Refusal.ALREADY_PAID
    # The same witness holds a lock on seq 1: another seq-1 transfer is an equivocation...
    eq = w.handle_transfer(transfer(P, other, 1), other, led, NOW_MS)
    assert isinstance(eq, ReportEquivocation)
    # ...while a witness without that lock (it never saw seq 1) calls it stale.
    fresh = Witness(WITNESS_KEYS[0])
    stale = fresh.handle_transfer(transfer(P, other, 1), other, led, NOW_MS)
    assert isinstance(stale, Refuse) and stale.reason is Refusal.STALE_SEQ
    assert stale.next_seq == 2
    # A non-member is refused.
    outsider = Witness(key(77))
    action = outsider.handle_transfer(transfer(P, other, 2), other, led, NOW_MS)
    assert isinstance(action, Refuse) and action.reason is Refusal.NOT_IN_COMMITTEE
    # A banned payer is refused.
    ra, rb = receipt(P, X, 1, 3), receipt(P, Y, 1, 4)
    led.ingest_equivocation_proof(EquivocationProof.of(transfer(P, ra, 2), transfer(P, rb, 2)))
    assert reason(transfer(P, other, 2), rec=other) is Refusal.BANNED


def test_bad_transfer_signature_raises() -> None:
    world = _world()
    r = receipt(P, X, 10, 1)
    t = transfer(P, r, 1)
    from protocols.signing import seal

    forged = Signed(message=t.message, envelope=seal(X, Transfer.DOMAIN, t.message.to_body()))
    with pytest.raises(RemoteProtocolError):
        world.witnesses[0].handle_transfer(forged, r, world.ledgers[0], NOW_MS)


def test_wire_round_trips() -> None:
    world = _world()
    r = receipt(P, X, 10, 1)
    t = transfer(P, r, 1)
    cert = world.certify(t, r)
    assert cert is not None
    r2 = receipt(P, Y, 20, 2)
    req = TransferRequest(transfer(P, r2, 2), r2, history=(cert,))
    back = TransferRequest.from_bytes(req.to_bytes())
    assert back.transfer.digest == req.transfer.digest
    assert back.receipt.receipt_id == r2.receipt_id
    assert back.history[0].digest == cert.digest
    vote = sign_vote(WITNESS_KEYS[0], t)
    assert decode_reply(encode_reply(ReplyVote(vote))) == vote
    refuse = Refuse(Refusal.OVER_LIMIT, "no", 3)
    assert decode_reply(encode_reply(refuse)) == refuse
    with pytest.raises(RemoteProtocolError):
        TransferRequest.from_bytes(b"\x00garbage")
    with pytest.raises(RemoteProtocolError):
        decode_reply(b"\xa1\x61v\x02")


# --- no two certificates for one (account, seq), whatever the interleaving --------------------


class DoubleSpend(RuleBasedStateMachine):
    """3 honest witnesses + 1 byzantine that votes for anything; the payer equivocates.

    Honest witnesses lose everything not yet persisted when they crash. Votes
    go to a shared pool the attacker sees in full; the invariant is that no
    (account, seq) ever has quorum-many valid votes for two different transfers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pol = policy(genesis=GENESIS)
        self.rul: CommitteeRule = committee_rule()
        self.committee = self.rul.committee_for(pid(P))
        self.ledgers = [LedgerState(self.rul, self.pol) for _ in range(3)]
        self.witnesses = [Witness(k) for k in WITNESS_KEYS[:3]]
        self.durable: list[list[LockRecord]] = [[], [], []]
        self.pending: list[list[LockRecord]] = [[], [], []]
        # Two conflicting transfers for each of seq 1 and seq 2.
        self.options: dict[int, list[tuple[Signed[Transfer], object]]] = {}
        job = 0
        for seq in (1, 2):
            self.options[seq] = []
            for payee in (X, Y):
                job += 1
                r = receipt(P, payee, 10, job)
                self.options[seq].append((transfer(P, r, seq), r))
                for led in self.ledgers:
                    led.ingest_receipt(r)
        self.votes: dict[bytes, dict[str, Signed[WitnessVote]]] = {}
        self.released: dict[tuple[int, int], set[bytes]] = {}

    def _pool(self, vote: Signed[WitnessVote]) -> None:
        self.votes.setdefault(vote.message.transfer, {})[vote.message.witness] = vote

    @rule(w=st.integers(0, 2), seq=st.sampled_from([1, 2]), which=st.integers(0, 1))
    def ask(self, w: int, seq: int, which: int) -> None:
        t, r = self.options[seq][which]
        action = self.witnesses[w].handle_transfer(t, r, self.ledgers[w], NOW_MS)  # type: ignore[arg-type]
        if isinstance(action, PersistLock):
            if action.record not in self.pending[w]:
                self.pending[w].append(action.record)
        elif isinstance(action, ReplyVote):
            self._release(w, action)
        elif isinstance(action, ReportEquivocation):
            action.proof.verify()

    def _release(self, w: int, action: ReplyVote) -> None:
        v = action.vote.message
        self.released.setdefault((w, v.seq), set()).add(v.transfer)
        self._pool(action.vote)

    @rule(w=st.integers(0, 2), data=st.data())
    def persist(self, w: int, data: st.DataObject) -> None:
        if not self.pending[w]:
            return
        record = data.draw(st.sampled_from(self.pending[w]))
        self.pending[w].remove(record)
        self.durable[w].append(record)
        self._release(w, self.witnesses[w].lock_persisted(record))

    @rule(w=st.integers(0, 2), data=st.data())
    def persist_fails(self, w: int, data: st.DataObject) -> None:
        if not self.pending[w]:
            return
        record = data.draw(st.sampled_from(self.pending[w]))
        self.pending[w].remove(record)
        self.witnesses[w].lock_failed(record)

    @rule(w=st.integers(0, 2))
    def crash(self, w: int) -> None:
        self.pending[w] = []
        self.witnesses[w] = Witness(WITNESS_KEYS[w], durable_locks=self.durable[w])

    @rule(seq=st.sampled_from([1, 2]), which=st.integers(0, 1))
    def byzantine_votes(self, seq: int, which: int) -> None:
        self._pool(sign_vote(WITNESS_KEYS[3], self.options[seq][which][0]))

    @rule(seq=st.sampled_from([1, 2]), which=st.integers(0, 1))
    def gossip_certificate(self, seq: int, which: int) -> None:
        """If a certificate can be built, every honest ledger learns it."""
        t, _ = self.options[seq][which]
        asm = CertificateAssembler(t, self.committee)
        cert = None
        for vote in self.votes.get(t.digest, {}).values():
            cert = asm.add_vote(vote) or cert
        if cert is not None:
            for led in self.ledgers:
                led.ingest_certificate(cert)

    @invariant()
    def at_most_one_certificate_per_seq(self) -> None:
        for seq in (1, 2):
            certified = [
                t.digest
                for t, _ in self.options[seq]
                if len(self.votes.get(t.digest, {})) >= self.committee.quorum
            ]
            assert len(certified) <= 1, f"two certificates for seq {seq}"

    @invariant()
    def honest_witnesses_vote_once_per_seq(self) -> None:
        for digests in self.released.values():
            assert len(digests) == 1


TestDoubleSpend = DoubleSpend.TestCase
TestDoubleSpend.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_bit_flipped_certificates_never_verify(data: st.DataObject) -> None:
    cert = _CERT.get("c")
    if cert is None:
        world = _world()
        r = receipt(P, X, 10, 1)
        cert = world.certify(transfer(P, r, 1), r)
        assert cert is not None
        _CERT["c"] = cert
    committee = committee_rule().committee_for(pid(P))
    raw = bytearray(cert.to_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(RemoteProtocolError):
        Certificate.from_bytes(bytes(raw)).verify(committee)


_CERT: dict[str, Certificate] = {}

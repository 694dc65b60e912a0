"""Referee panels drawn from a checkpoint's serving pool, seeded by the executor's signed
commitment (protocols/committee.py ``select_panel``, protocols/proofs.py ``referee_panel``).

The rules that guard money here: a requester that grinds job ids does not choose its panel;
every verdict in a proof names the checkpoint whose pool drew the panel, and a verifier
draws the same panel under it; an honest referee signs only under a recent checkpoint.
Each test fails when its rule is removed.
"""

from __future__ import annotations

import hashlib
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.market.referee import RefereeService
from protocols.committee import CommitteeRule, RefereePanel, UnknownCheckpoint, select_referees
from protocols.errors import ValidationError
from protocols.proofs import ArbitratedReceipt, FraudProof, referee_panel, sign_referee_result
from protocols.receipt import ResultCommitment, commit, content_digest, open_commitment
from protocols.signed import Signed, message_digest
from protocols.tensor import DEFAULT_LIMITS
from protocols.verification import decide
from tests.unit.settlement_fixtures import BEACON, CID, key, pid
from tests.unit.test_epochs import EPOCH_MS, GENESIS, MEMBER_KEYS, MEMBERS, grow, new_rules

POOL_KEYS = [key(700 + i) for i in range(30)]
POOL = [pid(k) for k in POOL_KEYS]
KEY_OF = {pid(k): k for k in [*POOL_KEYS, *MEMBER_KEYS]}
COLLUDERS = frozenset(POOL[:6])  # 20 % of the pool works for the requester
REQ, EXE = key(1), key(2)
SERVE_CID = {m: (CID,) for m in MEMBERS}  # every checkpoint member serves the claims' model


def claim(job_id: bytes, executor: object = EXE, model: str = CID) -> Signed[ResultCommitment]:
    return commit(
        executor,  # type: ignore[arg-type]
        ResultCommitment(
            job_id=job_id,
            requester=pid(REQ),
            executor=pid(executor),  # type: ignore[arg-type]
            model_cid=model,
            input_digest=content_digest({"x": job_id}),
            output_digest=content_digest({"y": b"right"}),
            price=100,
            compute_ms=3,
        ),
    )


def pool_rule(**over: object) -> CommitteeRule:
    fields: dict[str, object] = {
        "beacon": BEACON,
        "pool": frozenset(POOL),
        "fallback": frozenset({GENESIS}),
        **over,
    }
    return CommitteeRule(**fields)  # type: ignore[arg-type]


def colluders_decide(panel: RefereePanel) -> bool:
    return sum(m in COLLUDERS for m in panel.members) >= panel.threshold


def job_id(i: int) -> bytes:
    return hashlib.sha256(b"job-%d" % i).digest()[:16]


@settings(max_examples=60, deadline=None)
@given(
    jid=st.binary(min_size=16, max_size=16),
    pool_size=st.integers(0, 12),
    size=st.sampled_from([1, 3, 5]),
)
def test_a_panel_is_drawn_from_the_pool_without_the_parties(
    jid: bytes, pool_size: int, size: int
) -> None:
    rule = pool_rule(pool=frozenset(POOL[:pool_size]), referee_panel_size=size)
    c = claim(jid)
    panel = referee_panel(rule, c, 0)
    assert panel == referee_panel(rule, open_commitment(c.to_bytes()), 0)
    assert panel.job_id == jid and panel.cp == 0
    assert pid(REQ) not in panel and pid(EXE) not in panel
    if pool_size >= size:  # enough serving peers: the fallback (genesis witnesses) stays out
        assert len(panel.members) == size and set(panel.members) <= set(POOL[:pool_size])
    else:  # too few: topped up from the fallback, and smaller if still short
        assert set(panel.members) <= set(POOL[:pool_size]) | {GENESIS}
        assert len(panel.members) == min(size, pool_size + 1)


def test_grinding_job_ids_does_not_choose_the_panel() -> None:
    """A requester with 6 colluders in a pool of 30 grinds job ids until its predicted panel
    has a colluding majority. It can predict the old rule (seed: the job id) and anything
    it can sign itself, never the executor's signature: its picks land on a colluding
    majority at about the base rate (~10 %), not every time."""
    parties = (pid(REQ), pid(EXE))
    rule = pool_rule()
    own = key(3)  # the best it can do without the executor's key: sign the claim itself

    def predicted_old(jid: bytes) -> bool:
        return colluders_decide(select_referees(jid, parties, BEACON, POOL))

    def predicted_own_key(jid: bytes) -> bool:
        return colluders_decide(referee_panel(rule, claim(jid, own), 0))

    def predicted_body(jid: bytes) -> bool:
        """It knows the whole commitment body (outputs, price, even compute_ms here)."""
        body = claim(jid).message
        seed = message_digest(body)
        return colluders_decide(rule.panel_at(0, seed, jid, parties, model_cid=body.model_cid))

    base = [colluders_decide(referee_panel(rule, claim(job_id(i)), 0)) for i in range(300)]
    assert 0.03 <= sum(base) / len(base) <= 0.2
    for predict in (predicted_old, predicted_own_key, predicted_body):
        picks = []
        for i in count(10_000):
            if predict(job_id(i)):
                picks.append(job_id(i))
            if len(picks) == 40:
                break
        # Under the rule it predicts, every pick is a colluding panel ...
        assert all(predict(j) for j in picks)
        # ... under the rule as built, only about the base rate are.
        got = sum(colluders_decide(referee_panel(rule, claim(j), 0)) for j in picks)
        assert got <= 12, f"{predict.__name__}: {got} of 40 picks gave the requester its panel"


def test_the_panel_depends_on_the_executors_signature_not_only_the_job() -> None:
    """Same job id, requester, model and input, two executors: two independent draws."""
    jid, other = job_id(1), key(4)
    rule = pool_rule(pool=frozenset(POOL), referee_panel_size=5)
    a, b = referee_panel(rule, claim(jid), 0), referee_panel(rule, claim(jid, other), 0)
    assert a.members != b.members
    assert a.members != select_referees(jid, (pid(REQ), pid(EXE)), BEACON, POOL, size=5).members


def _verdicts(c: Signed[ResultCommitment], members: tuple[str, ...], cp: int, verdict: str):  # type: ignore[no-untyped-def]
    return [
        sign_referee_result(
            KEY_OF[m],
            c,
            output_digest=content_digest({"y": b"right"}),
            verdict=verdict,  # type: ignore[arg-type]
            time_ms=5 * EPOCH_MS,
            cp=cp,
        )
        for m in members
    ]


def test_panels_come_from_the_current_checkpoints_serving_pool_and_verify_under_it() -> None:
    rules = new_rules(lag=1, age=1)
    grow(rules, 4, {m: 1 for m in MEMBERS}, SERVE_CID)
    rules.tick(5 * EPOCH_MS)
    cp = rules.panel_cp
    assert cp == 4 and rules.panel_cps() == frozenset({3, 4})
    c = claim(job_id(7))
    panel = referee_panel(rules, c, cp)
    assert set(panel.members) <= set(MEMBERS) and GENESIS not in panel  # serving peers only
    proof = decide(c, _verdicts(c, panel.members, cp, "mismatch"), panel)
    assert isinstance(proof, FraudProof) and proof.cp == cp
    FraudProof.from_bytes(proof.to_bytes()).verify_under(rules)  # any peer holding cp 4
    arbitrated = decide(c, _verdicts(c, panel.members, cp, "match"), panel)
    assert isinstance(arbitrated, ArbitratedReceipt)
    ArbitratedReceipt.from_bytes(arbitrated.to_bytes()).verify_under(rules)
    # A peer that lacks checkpoint 4 cannot check it yet (sync, then retry).
    behind = new_rules(lag=1, age=1)
    grow(behind, 3, {m: 1 for m in MEMBERS}, SERVE_CID)
    with pytest.raises(UnknownCheckpoint):
        proof.verify_under(behind)


def test_every_verdict_must_name_the_checkpoint_of_the_panel() -> None:
    rules = new_rules(lag=1, age=1)
    grow(rules, 4, {m: 1 for m in MEMBERS}, SERVE_CID)
    c = claim(job_id(8))
    panel = referee_panel(rules, c, 4)
    # The same referees signing under another checkpoint do not make a proof for this panel,
    verdicts = _verdicts(c, panel.members, 3, "mismatch")
    assert decide(c, verdicts, panel) is None
    with pytest.raises(ValidationError, match="names checkpoint 3"):
        FraudProof.of(c, tuple(verdicts)).verify(panel)
    # and a proof naming checkpoint 3 is checked against checkpoint 3's panel.
    p3 = referee_panel(rules, c, 3)
    if set(p3.members) != set(panel.members):
        with pytest.raises(ValidationError):
            FraudProof.of(c, tuple(verdicts)).verify_under(rules)
    # A proof whose verdicts name two checkpoints is refused (under either checkpoint's
    # panel: the one its first verdict names is the one it is checked against).
    mixed = FraudProof.of(c, (*_verdicts(c, panel.members[:1], 4, "mismatch"), *verdicts[1:]))
    with pytest.raises(ValidationError, match="names checkpoint"):
        mixed.verify(panel)
    with pytest.raises(ValidationError):
        mixed.verify_under(rules)


def test_the_genesis_draw_of_a_claim_is_not_its_pool_draw() -> None:
    """Verdicts of pool members named under the genesis rule (cp 0: the genesis witness
    alone) are off its panel: a proof cannot pick the genesis rule to dodge the pool."""
    rules = new_rules(lag=1, age=1)
    grow(rules, 4, {m: 1 for m in MEMBERS}, SERVE_CID)
    c = claim(job_id(9))
    panel = referee_panel(rules, c, 4)
    assert referee_panel(rules, c, 0).members == (GENESIS,)
    proof = FraudProof.of(c, tuple(_verdicts(c, panel.members, 0, "mismatch")))
    with pytest.raises(ValidationError, match="not on the job's referee panel"):
        proof.verify_under(rules)


def test_an_honest_referee_signs_only_under_a_recent_checkpoint() -> None:
    rules = new_rules(lag=1, age=1)
    grow(rules, 6, {m: 1 for m in MEMBERS}, SERVE_CID)
    rules.tick(7 * EPOCH_MS)
    assert rules.panel_cps() == frozenset({5, 6})
    service = RefereeService(
        key=MEMBER_KEYS[0],
        peer_id=MEMBERS[0],
        host=None,
        worker=None,  # type: ignore[arg-type]
        limits=DEFAULT_LIMITS,
        rule=lambda: rules,
    )
    c = claim(job_id(10))
    for cp in (5, 6):
        assert service.panel_for(c, cp) == referee_panel(rules, c, cp)
    for stale in (0, 2, 4):  # an old draw the asking party might like better
        with pytest.raises(ValidationError, match="drawn under checkpoint"):
            service.panel_for(c, stale)
    service.rule = lambda: None
    assert service.panel_for(c, 2) is None  # no rule known: no panel check

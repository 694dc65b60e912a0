"""Rules of fraud proofs, referee results and certificates that mutation testing found no
test holding (issue 17). Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/proofs.py protocols/certificate.py``).
"""

from __future__ import annotations

import pytest
from settlement_fixtures import (
    WITNESS_KEYS,
    World,
    key,
    pid,
    policy,
    receipt,
    signed_commitment,
    transfer,
)
from settlement_fixtures import rule as committee_rule
from test_proofs import EXE, REQ, _verdicts

from protocols.certificate import open_certificate, open_vote, sign_vote
from protocols.committee import MAX_COMMITTEE
from protocols.errors import RemoteProtocolError, ValidationError
from protocols.ledger import MAX_TIME_MS
from protocols.proofs import FraudProof, RefereeResult, referee_panel, sign_referee_result
from protocols.signed import Signed
from protocols.signing import Envelope, seal


def test_a_one_referee_panel_gives_a_fraud_proof_of_one_verdict() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    panel = referee_panel(committee_rule(referee_panel_size=1), c, 0)
    assert panel.threshold == 1
    keys = {pid(k): k for k in WITNESS_KEYS}
    (only,) = panel.members
    verdict = sign_referee_result(
        keys[only], c, output_digest=b"o" * 32, verdict="mismatch", time_ms=1
    )
    proof = FraudProof.from_bytes(FraudProof.of(c, (verdict,)).to_bytes())
    proof.verify(panel)


def test_a_proof_carries_up_to_max_committee_verdicts() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    verdicts = tuple(
        sign_referee_result(key(300 + i), c, output_digest=b"o" * 32, verdict="mismatch", time_ms=1)
        for i in range(MAX_COMMITTEE + 1)
    )
    full = FraudProof.of(c, verdicts[:MAX_COMMITTEE])
    assert len(FraudProof.from_bytes(full.to_bytes()).results) == MAX_COMMITTEE
    with pytest.raises(RemoteProtocolError):
        FraudProof.from_bytes(FraudProof.of(c, verdicts).to_bytes())


def test_a_referee_result_time_is_capped_like_every_ledger_time() -> None:
    c = signed_commitment(REQ, EXE, 100, 7)
    (ok,) = _verdicts(c, "match", 1, time_ms=MAX_TIME_MS)
    with pytest.raises(ValidationError, match="time_ms"):
        RefereeResult(**{**ok.message.__dict__, "time_ms": MAX_TIME_MS + 1})


def test_open_certificate_and_open_vote_check_what_they_open() -> None:
    world = World(policy(genesis=frozenset({pid(REQ)})))
    r = receipt(REQ, EXE, 10, 1)
    t = transfer(REQ, r, 1)
    cert = world.certify(t, r)
    assert cert is not None
    committee = world.rul.committee_for(pid(REQ))
    assert open_certificate(cert.to_bytes(), committee).digest == cert.digest
    other = committee_rule(fallback=frozenset({pid(key(400 + i)) for i in range(4)}))
    with pytest.raises(RemoteProtocolError):
        open_certificate(cert.to_bytes(), other.committee_for(pid(REQ)))
    vote = sign_vote(WITNESS_KEYS[0], t)
    assert open_vote(vote.to_bytes()) == vote
    with pytest.raises(RemoteProtocolError):
        open_vote(vote.to_bytes()[:-1])


def test_a_fraud_proof_parses_its_shape_only_and_verify_checks_the_signatures() -> None:
    """from_bytes needs no panel (facts are relayed and stored as bytes); verify(panel)
    refuses a forged commitment or verdict."""
    c = signed_commitment(REQ, EXE, 100, 7)
    panel = referee_panel(committee_rule(), c, 0)
    good = _verdicts(c, "mismatch")
    forged_c = Signed(message=c.message, envelope=_reseal(c))
    forged_v = (Signed(message=good[0].message, envelope=_reseal(good[0])), *good[1:])
    for proof in (FraudProof(commitment=forged_c, results=good), FraudProof(c, forged_v)):
        parsed = FraudProof.from_bytes(proof.to_bytes())
        with pytest.raises(RemoteProtocolError):
            parsed.verify(panel)


def _reseal(s: Signed) -> Envelope:  # type: ignore[type-arg]
    return seal(key(9), s.envelope.domain, s.message.to_body())

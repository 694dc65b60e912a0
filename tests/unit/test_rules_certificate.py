"""Certificate parsing rules that mutation testing found no test holding (issue 17).
Each test names one rule and fails when that rule is broken
(``python bench/mutation.py --paths protocols/certificate.py``).
"""

from __future__ import annotations

import pytest
from settlement_fixtures import WITNESS_KEYS, World, key, pid, policy, receipt, transfer
from test_proofs import EXE, REQ

from protocols.certificate import Certificate, WitnessVote, make_certificate, sign_vote
from protocols.committee import MAX_COMMITTEE
from protocols.errors import RemoteProtocolError
from protocols.ledger import MAX_SEQ
from protocols.signed import Signed
from protocols.signing import seal


def _transfer():  # type: ignore[no-untyped-def]
    return transfer(REQ, receipt(REQ, EXE, 10, 1), 1)


def test_a_certificate_carries_1_to_max_committee_votes() -> None:
    t = _transfer()
    votes = [sign_vote(key(500 + i), t) for i in range(MAX_COMMITTEE + 1)]
    for n in (1, MAX_COMMITTEE):
        cert = make_certificate(t, votes[:n])
        assert len(Certificate.from_bytes(cert.to_bytes()).votes) == n
    with pytest.raises(RemoteProtocolError):
        Certificate.from_bytes(make_certificate(t, votes).to_bytes())


def test_a_certificate_parses_its_shape_only_and_verify_checks_the_signatures() -> None:
    """from_bytes needs no committee; verify(committee) refuses a forged transfer or vote."""
    world = World(policy(genesis=frozenset({pid(REQ)})))
    t = _transfer()
    votes = [sign_vote(k, t) for k in WITNESS_KEYS]
    committee = world.rul.committee_for(pid(REQ))
    make_certificate(t, votes).verify(committee)
    forged_t = _resealed(t)
    forged_v = _resealed(votes[0])
    for cert in (make_certificate(forged_t, votes), make_certificate(t, [forged_v, *votes[1:]])):
        parsed = Certificate.from_bytes(cert.to_bytes())
        with pytest.raises(RemoteProtocolError):
            parsed.verify(committee)


def _resealed(s: Signed) -> Signed:  # type: ignore[type-arg]
    return Signed(message=s.message, envelope=seal(key(9), s.envelope.domain, s.message.to_body()))


def test_a_vote_is_for_a_seq_from_1_to_max_seq() -> None:
    t = _transfer()
    vote = sign_vote(WITNESS_KEYS[0], t).message
    assert WitnessVote(vote.account, MAX_SEQ, vote.transfer, vote.witness).seq == MAX_SEQ
    for seq in (0, MAX_SEQ + 1):
        with pytest.raises(RemoteProtocolError):
            WitnessVote(vote.account, seq, vote.transfer, vote.witness)

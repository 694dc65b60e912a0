"""Referee panels per model: a claim's panel is drawn only from the checkpoint's pool
members that serve the claim's model (protocols/epochs.py ``PoolCheckpoint.models``,
protocols/committee.py ``CommitteeRule.servers``), the genesis witnesses only when too few
serve it.

The rules that guard money here: every ledger that holds a checkpoint draws the same panel
from it; a member that does not serve the model is never drawn; a proof signed by a panel
that includes a non-server is refused. Each test fails when its rule is removed.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.codec import encode
from protocols.committee import select_panel
from protocols.epochs import (
    MAX_MEMBER_MODELS,
    MAX_MODELS,
    CertifiedCheckpoint,
    PoolCheckpoint,
    decode_stand_reply,
    encode_stand,
    propose_models,
)
from protocols.errors import ProtocolError, ValidationError
from protocols.proofs import FraudProof, panel_seed, referee_panel
from tests.unit.test_epochs import GENESIS, MEMBERS, NETWORK, grow, new_rules
from tests.unit.test_referee_panel import KEY_OF, _verdicts, claim, job_id

MODELS = sorted(hashlib.sha256(b"model-%d" % i).hexdigest() for i in range(3))
SINCE = {m: 1 for m in MEMBERS}


serves_strategy = st.dictionaries(
    st.sampled_from(MEMBERS), st.sets(st.sampled_from(MODELS), max_size=3), max_size=len(MEMBERS)
)


@settings(max_examples=40, deadline=None)
@given(serves=serves_strategy, jid=st.binary(min_size=16, max_size=16), m=st.integers(0, 2))
def test_a_member_that_does_not_serve_the_model_is_never_drawn(
    serves: dict[str, set[str]], jid: bytes, m: int
) -> None:
    rules = new_rules(lag=1, age=1)
    grow(rules, 3, SINCE, serves)
    model = MODELS[m]
    c = claim(jid, model=model)
    servers = {p for p, cids in serves.items() if model in cids}
    rules.tick(4 * rules.epoch_ms)  # panels drawn under checkpoint 3 now
    assert rules.describe()["serving"].get(model, 0) == len(servers)
    panel = referee_panel(rules, c, 3)
    for member in panel.members:
        assert member in servers or member == GENESIS, "a non-server was drawn"
    if len(servers) >= rules.referee_panel_size:
        assert set(panel.members) <= servers  # the genesis witness only when too few serve
    else:
        assert set(panel.members) == servers | {GENESIS}


@settings(max_examples=25, deadline=None)
@given(serves=serves_strategy, jid=st.binary(min_size=16, max_size=16), m=st.integers(0, 2))
def test_every_ledger_draws_the_same_panel_from_the_same_checkpoints(
    serves: dict[str, set[str]], jid: bytes, m: int
) -> None:
    """Two ledgers that got the same certified checkpoints (one over the wire, re-parsed)
    draw the same panel, whatever order the proposer heard the members in."""
    here = new_rules(lag=1, age=1)
    grow(here, 3, SINCE, serves)
    there = new_rules(lag=1, age=1)
    for e in here.epochs():
        held = here.get(e)
        assert held is not None
        there.add(CertifiedCheckpoint.from_bytes(held.to_bytes()))
    shuffled = dict(reversed(list(serves.items())))
    members = tuple(sorted(SINCE.items()))
    assert propose_models(members, shuffled) == propose_models(members, serves)
    c = claim(jid, model=MODELS[m])
    assert referee_panel(here, c, 3) == referee_panel(there, c, 3)


def test_a_proof_from_a_panel_with_a_non_server_is_refused() -> None:
    """A panel drawn from the whole pool (ignoring who serves the model) may name members
    that cannot run it; their verdicts do not make a proof."""
    serves = {p: {MODELS[0]} for p in MEMBERS[:4]} | {p: {MODELS[1]} for p in MEMBERS[4:]}
    rules = new_rules(lag=1, age=1)
    grow(rules, 3, SINCE, serves)
    rule = rules.rule_at(3)
    for i in range(200):
        c = claim(job_id(i), model=MODELS[0])
        msg = c.message
        blind = select_panel(
            panel_seed(c),
            msg.job_id,
            (msg.requester, msg.executor),
            rule.beacon,
            rule.pool,  # every member, servers or not: the rule this test guards
            cp=3,
            size=rule.referee_panel_size,
        )
        if any(p in MEMBERS[4:] for p in blind.members):
            break
    else:
        raise AssertionError("no blind panel with a non-server in 200 claims")
    proof = FraudProof.of(c, tuple(_verdicts(c, blind.members, 3, "mismatch")))
    proof.verify(blind)  # it is a majority of the blind panel,
    with pytest.raises(ValidationError, match="not on the job's referee panel"):
        proof.verify_under(rules)  # but not of the claim's panel
    real = referee_panel(rules, c, 3)
    assert set(real.members) <= set(MEMBERS[:4])
    FraudProof.of(c, tuple(_verdicts(c, real.members, 3, "mismatch"))).verify_under(rules)
    assert all(m in KEY_OF for m in real.members)


def test_the_models_table_round_trips_and_an_empty_one_keeps_the_digest() -> None:
    members = tuple(sorted(SINCE.items()))
    plain = PoolCheckpoint(NETWORK, 1, 0, NETWORK, members)
    assert b"models" not in plain.to_bytes()
    a, b = members[0][0], members[3][0]
    table = propose_models(members, {a: [MODELS[1], MODELS[0]], b: [MODELS[1]], "x": [MODELS[2]]})
    assert dict(table) == {MODELS[0]: (0,), MODELS[1]: (0, 3)}  # sorted by cid, non-members out
    c = PoolCheckpoint(NETWORK, 1, 0, NETWORK, members, table)
    again = PoolCheckpoint.from_bytes(c.to_bytes())
    assert again == c and again.digest == c.digest != plain.digest
    assert again.serving() == {MODELS[0]: {a}, MODELS[1]: {a, b}}


@pytest.mark.parametrize(
    "models",
    [
        ((MODELS[1], (0,)), (MODELS[0], (0,))),  # not sorted by cid
        ((MODELS[0], (0,)), (MODELS[0], (1,))),  # a cid twice
        ((MODELS[0], ()),),  # nobody serves it
        ((MODELS[0], (1, 0)),),  # indexes not sorted
        ((MODELS[0], (0, 0)),),  # an index twice
        ((MODELS[0], (len(MEMBERS),)),),  # no such member
        (("not-a-cid", (0,)),),
    ],
)
def test_a_malformed_models_table_is_refused(models: object) -> None:
    members = tuple(sorted(SINCE.items()))
    with pytest.raises(ValidationError):
        PoolCheckpoint(NETWORK, 1, 0, NETWORK, members, models)  # type: ignore[arg-type]


def test_the_models_table_is_bounded() -> None:
    members = tuple(sorted(SINCE.items()))
    many = [hashlib.sha256(b"m%d" % i).hexdigest() for i in range(MAX_MODELS + 20)]
    one_each = {p: many[i * 10 : i * 10 + MAX_MEMBER_MODELS + 2] for i, p in enumerate(MEMBERS)}
    table = propose_models(members, one_each)
    assert len(table) <= MAX_MODELS
    per_member = [sum(i in ix for _, ix in table) for i in range(len(members))]
    assert max(per_member) == MAX_MEMBER_MODELS  # each member's first 8 cids, sorted
    PoolCheckpoint(NETWORK, 1, 0, NETWORK, members, table)
    over = tuple((cid, (0,)) for cid in sorted(many[: MAX_MEMBER_MODELS + 1]))
    with pytest.raises(ValidationError, match="recorded for over"):
        PoolCheckpoint(NETWORK, 1, 0, NETWORK, members, over)
    too_many = tuple((cid, (i % len(members),)) for i, cid in enumerate(sorted(many)))
    with pytest.raises(ValidationError):
        PoolCheckpoint(NETWORK, 1, 0, NETWORK, members, too_many)
    # Past MAX_MODELS cids the ones served by the most members are kept.
    crowd = {p: [MODELS[2]] for p in MEMBERS} | {MEMBERS[0]: many[:MAX_MEMBER_MODELS]}
    assert MODELS[2] in dict(propose_models(members, crowd))


def test_a_stand_reply_names_the_models_it_serves() -> None:
    assert decode_stand_reply(encode_stand(True, MODELS[:2])) == (True, tuple(MODELS[:2]))
    assert decode_stand_reply(encode_stand(False, MODELS)) == (False, ())  # only when standing
    assert decode_stand_reply(encode_stand(True)) == (True, ())
    for bad in (
        {"v": 1, "stand": True, "models": []},
        {"v": 1, "stand": True, "models": ["nope"]},
        {"v": 1, "stand": True, "models": MODELS * 3},
    ):
        with pytest.raises(ProtocolError):
            decode_stand_reply(encode(bad))

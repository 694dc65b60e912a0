"""Transfers, the balance fold, credit limits, escrow, identity PoW and the state hash."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from settlement_fixtures import (
    NOW_MS,
    World,
    key,
    pid,
    policy,
    receipt,
    rule,
    transfer,
)

from protocols.codec import decode, encode
from protocols.errors import RemoteProtocolError, SignatureError, ValidationError
from protocols.ledger import (
    CreditPolicy,
    IdentityProof,
    Transfer,
    fold_balances,
    open_transfer,
    solve_pow,
)
from protocols.ledger_state import FactKind, LedgerState, decode_item, encode_item
from protocols.witness import Refusal, Refuse

A, B, C = key(1), key(2), key(3)
IDS = [pid(key(i)) for i in range(6)]


def test_transfer_round_trip_and_bit_flips() -> None:
    r = receipt(A, B, 500, 1)
    t = transfer(A, r, 1)
    again = open_transfer(t.to_bytes())
    assert again.message == t.message and again.digest == t.digest
    raw = bytearray(t.to_bytes())
    for i in range(0, len(raw), 7):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        with pytest.raises(RemoteProtocolError):
            open_transfer(bytes(flipped))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", 0),
        ("amount", True),
        ("amount", -1),
        ("seq", 0),
        ("receipt_id", b"x"),
        ("payee", "nope"),
    ],
)
def test_transfer_fields_are_validated(field: str, value: object) -> None:
    fields: dict[str, object] = {
        "payer": pid(A),
        "payee": pid(B),
        "amount": 1,
        "seq": 1,
        "receipt_id": b"r" * 32,
        "time_ms": NOW_MS,
    }
    fields[field] = value
    with pytest.raises(ValidationError):
        Transfer(**fields)  # type: ignore[arg-type]


def test_transfer_signed_by_someone_else_fails() -> None:
    from protocols.signed import Signed
    from protocols.signing import seal

    t = transfer(A, receipt(A, B, 5, 1), 1)
    forged = Signed(message=t.message, envelope=seal(C, Transfer.DOMAIN, t.message.to_body()))
    with pytest.raises(SignatureError):
        forged.verify()


transfers_st = st.lists(
    st.tuples(st.sampled_from(IDS), st.sampled_from(IDS), st.integers(1, 10**9)).filter(
        lambda x: x[0] != x[1]
    ),
    max_size=40,
)


@settings(max_examples=100)
@given(transfers_st, st.randoms(use_true_random=False))
def test_fold_is_order_independent_and_sums_to_zero(
    raw: list[tuple[str, str, int]], rnd: random.Random
) -> None:
    ts = [
        Transfer(payer=p, payee=q, amount=a, seq=i + 1, receipt_id=b"r" * 32, time_ms=0)
        for i, (p, q, a) in enumerate(raw)
    ]
    shuffled = list(ts)
    rnd.shuffle(shuffled)
    assert fold_balances(ts) == fold_balances(shuffled)
    assert sum(fold_balances(ts).values()) == 0


def _trade(world: World, n: int) -> list[bytes]:
    """n certified payments among three genesis accounts; returns the facts' wire items."""
    keys = [A, B, C]
    seqs = {pid(k): 0 for k in keys}
    items = []
    for j in range(n):
        payer, payee = keys[j % 3], keys[(j + 1) % 3]
        r = receipt(payer, payee, 10 + j, 1000 + j)
        seqs[pid(payer)] += 1
        cert = world.certify(transfer(payer, r, seqs[pid(payer)]), r)
        assert cert is not None
        items.append(encode_item(FactKind.CERTIFICATE, cert.to_bytes()))
        items.append(encode_item(FactKind.RECEIPT, r.to_bytes()))
    return items


@settings(max_examples=15, deadline=None)
@given(st.randoms(use_true_random=False))
def test_ledger_state_is_independent_of_arrival_order(rnd: random.Random) -> None:
    pol = policy(genesis=frozenset({pid(A), pid(B), pid(C)}))
    items = _items(pol)
    order = list(items)
    rnd.shuffle(order)
    s1, s2 = LedgerState(rule(), pol), LedgerState(rule(), pol)
    for item in items:
        s1.ingest_bytes(*decode_item(item))
    for item in order + order[:3]:  # duplicates are ignored
        s2.ingest_bytes(*decode_item(item))
    assert s1.state_hash() == s2.state_hash()
    assert s1.balances() == s2.balances()
    assert sum(s1.balances().values()) == 0
    assert s1.next_seq(pid(A)) == 4 and s1.next_seq(pid(B)) == 3


_ITEMS_CACHE: dict[str, list[bytes]] = {}


def _items(pol: CreditPolicy) -> list[bytes]:
    """The same 7-payment trade for every example (signing it once keeps the test fast)."""
    if "items" not in _ITEMS_CACHE:
        _ITEMS_CACHE["items"] = _trade(World(pol), 7)
    return _ITEMS_CACHE["items"]


def test_new_identity_without_pow_cannot_go_negative() -> None:
    world = World(policy())
    r = receipt(A, B, 10, 1)
    led = world.ledgers[0]
    led.ingest_receipt(r)
    action = world.witnesses[0].handle_transfer(transfer(A, r, 1), r, led, NOW_MS)
    assert isinstance(action, Refuse) and action.reason is Refusal.OVER_LIMIT


def test_identity_pow_grants_the_base_limit_and_no_more() -> None:
    pol = policy(base_limit=1_000, pow_bits=6)
    world = World(pol)
    nonce = solve_pow(pid(A), 6, max_tries=100_000)
    assert nonce is not None
    proof = IdentityProof(pid(A), nonce)
    assert IdentityProof.from_bytes(proof.to_bytes()) == proof
    for led in [*world.ledgers, world.view]:
        assert led is not None
        assert led.ingest_identity_proof(proof)
    assert world.view is not None
    assert world.view.credit_limit(pid(A), NOW_MS) == 1_000
    r1 = receipt(A, B, 600, 1)
    assert world.certify(transfer(A, r1, 1), r1) is not None
    r2 = receipt(A, B, 401, 2)
    assert world.certify(transfer(A, r2, 2), r2) is None  # would reach -1001
    r3 = receipt(A, B, 400, 3)
    assert world.certify(transfer(A, r3, 2), r3) is not None
    assert world.view.balance(pid(A)) == -1_000


def test_weak_pow_is_rejected() -> None:
    pol = policy(pow_bits=20)
    nonce = solve_pow(pid(A), 3, max_tries=10_000)
    assert nonce is not None
    proof = IdentityProof(pid(A), nonce)
    if proof.bits < 20:
        with pytest.raises(ValidationError):
            LedgerState(rule(), pol).ingest_identity_proof(proof)


def test_earnings_are_escrowed_then_grow_the_limit() -> None:
    pol = policy(base_limit=100, fraud_window_ms=60_000, genesis=frozenset({pid(A)}))
    world = World(pol)
    r = receipt(A, B, 100, 1)
    assert world.certify(transfer(A, r, 1), r) is not None
    view = world.view
    assert view is not None
    assert view.balance(pid(B)) == 100
    assert view.spendable(pid(B), NOW_MS) == 0  # in escrow
    assert view.credit_limit(pid(B), NOW_MS) == 0  # no identity, nothing matured
    later = NOW_MS + 60_000
    assert view.spendable(pid(B), later) == 100
    assert view.earned(pid(B), later) == 100
    assert view.credit_limit(pid(B), later) == 50  # 0 base + 100 * 1/2
    # B may spend its 100 plus its 50 of credit, not more, once out of escrow.
    r2 = receipt(B, C, 151, 2)
    assert world.certify(transfer(B, r2, 1, time_ms=later), r2, later) is None
    r3 = receipt(B, C, 150, 3)
    assert world.certify(transfer(B, r3, 1, time_ms=later), r3, later) is not None
    assert view.balance(pid(B)) == -50


def test_credit_policy_formula() -> None:
    p = CreditPolicy(base_limit=10, earn_num=1, earn_den=2, max_limit=100)
    assert p.limit(earned=0, has_identity=False, banned=False) == 0
    assert p.limit(earned=0, has_identity=True, banned=False) == 10
    assert p.limit(earned=50, has_identity=True, banned=False) == 35
    assert p.limit(earned=10**9, has_identity=True, banned=False) == 100
    assert p.limit(earned=10**9, has_identity=True, banned=True) == 0


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 400)), min_size=1, max_size=12))
def test_credit_limits_hold_under_any_payment_sequence(payments: list[tuple[int, int]]) -> None:
    """Three fresh identities with PoW pay each other: nobody ends below -(base + k*earned)."""
    pol = policy(base_limit=500, fraud_window_ms=0)
    world = World(pol)
    keys = [A, B, C]
    for k in keys:
        nonce = solve_pow(pid(k), pol.pow_bits, max_tries=100_000)
        assert nonce is not None
        for led in [*world.ledgers, world.view]:
            assert led is not None
            led.ingest_identity_proof(IdentityProof(pid(k), nonce))
    seqs = [0, 0, 0]
    for j, (i, amount) in enumerate(payments):
        r = receipt(keys[i], keys[(i + 1) % 3], amount, j)
        if world.certify(transfer(keys[i], r, seqs[i] + 1), r) is not None:
            seqs[i] += 1
    view = world.view
    assert view is not None
    assert sum(view.balances().values()) == 0
    # The incrementally kept balances equal a fold from scratch.
    assert view.balances() == fold_balances(view.canonical_transfers())
    for k in keys:
        earned = view.earned(pid(k), NOW_MS)
        assert view.balance(pid(k)) >= -(500 + earned // 2)


def test_ledger_item_garbage_is_a_typed_error() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_item(b"\xff\x00")
    with pytest.raises(RemoteProtocolError):
        decode_item(encode({"v": 1, "k": 99, "b": b"x"}))
    with pytest.raises(RemoteProtocolError):
        LedgerState(rule(), policy()).ingest_bytes(FactKind.CERTIFICATE, b"\xa0")
    assert decode(encode_item(FactKind.RECEIPT, b"x"), max_size=100)["k"] == 1


def test_partitioned_ledgers_reconcile_to_one_state_hash() -> None:
    """Two ledgers that saw different halves of the trade converge through reconcile."""
    from protocols.reconcile import Reconciler

    pol = policy(genesis=frozenset({pid(A), pid(B), pid(C)}))
    items = _items(pol)
    left, right = LedgerState(rule(), pol), LedgerState(rule(), pol)
    for n, item in enumerate(items):
        for side in [left] if n % 3 == 0 else [right] if n % 3 == 1 else [left, right]:
            side.ingest_bytes(*decode_item(item))
    assert left.state_hash() != right.state_hash()
    a, b = Reconciler(left.fact_ids()), Reconciler(right.fact_ids())
    msg: bytes | None = a.initiate()
    for _ in range(10):
        assert msg is not None
        msg = b.receive(msg).reply
        if msg is None:
            break
        msg = a.receive(msg).reply
        if msg is None:
            break
    assert a.done
    # Push what the right side lacks, fetch what the left side lacks (any order works).
    for fid in a.have:
        item = left.item(fid)
        assert item is not None
        right.ingest_bytes(*item)
    for fid in reversed(a.need):
        item = right.item(fid)
        assert item is not None
        left.ingest_bytes(*item)
    assert left.state_hash() == right.state_hash()
    assert left.balances() == right.balances()


def test_eligible_pool_needs_identity_matured_earnings_and_no_ban() -> None:
    from protocols.ledger_state import replay

    pol = policy(genesis=frozenset({pid(A), pid(B)}), fraud_window_ms=1_000)
    world = World(pol)
    r1, r2 = receipt(A, B, 500, 1), receipt(B, C, 500, 2)
    assert world.certify(transfer(A, r1, 1), r1) is not None
    assert world.certify(transfer(B, r2, 1), r2) is not None
    view = world.view
    assert view is not None
    assert view.eligible_pool(NOW_MS, 100) == frozenset()  # still in escrow
    later = NOW_MS + 1_000
    # B: genesis identity and 500 earned; C earned too but has no identity proof.
    assert view.eligible_pool(later, 100) == {pid(B)}
    assert view.eligible_pool(later, 501) == frozenset()
    # A restart replays the stored facts into the same state.
    copy = LedgerState(rule(), pol)
    stored = [view.item(f) for f in view.fact_ids()]
    assert replay(copy, [s for s in stored if s is not None]) == len(view)
    assert copy.state_hash() == view.state_hash()

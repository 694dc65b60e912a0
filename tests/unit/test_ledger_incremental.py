"""The ledger keeps its digest, balances and per-account indexes in place: whatever subset of
facts arrives in whatever order (duplicates included), every incremental view equals the
same view computed from scratch over the fact set."""

from __future__ import annotations

import random
from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st
from settlement_fixtures import (
    NOW_MS,
    WITNESS_KEYS,
    World,
    key,
    pid,
    policy,
    receipt,
    rule,
    signed_commitment,
    transfer,
)

from protocols.certificate import Certificate, CertificateAssembler, sign_vote
from protocols.ledger import CreditPolicy, IdentityProof, Transfer, fold_balances, solve_pow
from protocols.ledger_state import (
    FactKind,
    LedgerState,
    digest_element,
    digest_of,
    state_hash_of,
)
from protocols.proofs import EquivocationProof, FraudProof, referee_panel, sign_referee_result

A, B, C, D = key(11), key(12), key(13), key(14)
W = 60_000  # fraud window
POL = policy(genesis=frozenset({pid(A), pid(B), pid(C)}), fraud_window_ms=W, base_limit=10**9)
KEY_OF = {pid(k): k for k in WITNESS_KEYS}


def _byzantine_cert(t_signed: object) -> Certificate:
    """A certificate signed by every witness, whatever they locked before (> f byzantine)."""
    asm = CertificateAssembler(t_signed, rule().committee_for(t_signed.message.payer))  # type: ignore[attr-defined]
    for k in WITNESS_KEYS:
        cert = asm.add_vote(sign_vote(k, t_signed))  # type: ignore[arg-type]
        if cert is not None:
            return cert
    raise AssertionError("no quorum")


@cache
def facts() -> tuple[tuple[FactKind, bytes], ...]:
    """Receipts, certificates at times around a fraud, a seq certified twice, an unpaid
    receipt, a fraud proof, an equivocation proof and an identity proof."""
    world = World(POL)
    out: list[tuple[FactKind, bytes]] = []
    seqs = {pid(A): 0, pid(B): 0, pid(C): 0}
    for j in range(9):
        payer, payee = [A, B, C][j % 3], [B, C, D][j % 3]
        r = receipt(payer, payee, 100 + j, 500 + j)
        seqs[pid(payer)] += 1
        t_ms = NOW_MS - 120_000 + j * 20_000  # some out of escrow, some in
        cert = world.certify(transfer(payer, r, seqs[pid(payer)], time_ms=t_ms), r, t_ms)
        assert cert is not None, j
        out += [(FactKind.RECEIPT, r.to_bytes()), (FactKind.CERTIFICATE, cert.to_bytes())]
    # A's next seq certified twice (a broken quorum): the smaller digest counts.
    r1, r2 = receipt(A, B, 7, 900), receipt(A, D, 9, 901)
    seq = seqs[pid(A)] + 1
    for r in (r1, r2):
        out += [
            (FactKind.RECEIPT, r.to_bytes()),
            (FactKind.CERTIFICATE, _byzantine_cert(transfer(A, r, seq)).to_bytes()),
        ]
    out.append((FactKind.RECEIPT, receipt(B, A, 5, 902).to_bytes()))  # never paid
    # D cheated: its payouts from T - W on are reversed.
    bad = signed_commitment(A, D, 1, 903, output=b"wrong")
    panel = referee_panel(rule(), bad, 0)
    verdicts = tuple(
        sign_referee_result(
            KEY_OF[m], bad, output_digest=b"o" * 32, verdict="mismatch", time_ms=NOW_MS - 30_000
        )
        for m in panel.members[:2]
    )
    out.append((FactKind.FRAUD_PROOF, FraudProof.of(bad, verdicts).to_bytes()))
    t1, t2 = transfer(C, r1, 50), transfer(C, r2, 50)
    out.append((FactKind.EQUIVOCATION_PROOF, EquivocationProof.of(t1, t2).to_bytes()))
    nonce = solve_pow(pid(D), POL.pow_bits, max_tries=100_000)
    assert nonce is not None
    out.append((FactKind.IDENTITY_PROOF, IdentityProof(pid(D), nonce).to_bytes()))
    return tuple(out)


def _scratch(state: LedgerState, pol: CreditPolicy, now: int) -> dict[str, object]:
    """Every view recomputed from the fact set alone (the definitions in docs/settlement.md)."""
    certs: dict[tuple[str, int], list[Certificate]] = {}
    fraud: dict[str, int] = {}
    receipts = []
    for fid in state.fact_ids():
        item = state.item(fid)
        assert item is not None
        kind, data = item
        if kind is FactKind.CERTIFICATE:
            c = Certificate.from_bytes(data)
            certs.setdefault((c.account, c.seq), []).append(c)
        elif kind is FactKind.FRAUD_PROOF:
            p = FraudProof.from_bytes(data)
            fraud[p.offender] = min(fraud.get(p.offender, p.time_ms), p.time_ms)
        elif kind is FactKind.RECEIPT:
            r = state.receipt(fid)
            assert r is not None
            receipts.append(r)
    canonical = [min(cs, key=lambda c: c.digest).transfer.message for cs in certs.values()]

    def reversed_(t: Transfer) -> bool:
        return t.payee in fraud and t.time_ms >= fraud[t.payee] - pol.fraud_window_ms

    effective = [t for t in canonical if not reversed_(t)]
    accounts = {t.payee for t in canonical} | {t.payer for t in canonical}
    escrow = {
        a: sum(t.amount for t in effective if t.payee == a and t.time_ms + W > now)
        for a in accounts
    }
    earned_from: dict[str, dict[str, int]] = {}
    for t in effective:
        if t.time_ms + W <= now:
            row = earned_from.setdefault(t.payee, {})
            row[t.payer] = row.get(t.payer, 0) + t.amount
    paid_rids = {cs[0].transfer.message.receipt_id for cs in certs.values()} | {
        c.transfer.message.receipt_id for cs in certs.values() for c in cs
    }
    paid_commitments = {r.commitment.digest for r in receipts if r.receipt_id in paid_rids}
    unpaid = {
        r.receipt_id
        for r in receipts
        if r.receipt_id not in paid_rids and r.commitment.digest not in paid_commitments
    }
    forfeited: dict[str, int] = {}
    for t in canonical:
        if reversed_(t):
            forfeited[t.payee] = forfeited.get(t.payee, 0) + t.amount
    return {
        "balances": fold_balances(effective),
        "escrowed": escrow,
        "earned_from": earned_from,
        "unpaid": unpaid,
        "forfeited": forfeited,
        "conflicts": sorted(k for k, cs in certs.items() if len(cs) > 1),
    }


def _views(state: LedgerState, now: int) -> dict[str, object]:
    accounts = {pid(k) for k in (A, B, C, D)}
    return {
        "balances": state.balances(),
        "escrowed": {a: state.escrowed(a, now) for a in accounts if a in _touched(state)},
        "earned_from": {
            a: state.earned_from(a, now) for a in accounts if state.earned_from(a, now)
        },
        "unpaid": {rid for p in accounts for rid in state.unpaid_for(p)},
        "forfeited": state.forfeited(),
        "conflicts": state.conflicts(),
    }


def _touched(state: LedgerState) -> set[str]:
    out = set()
    for payer in (A, B, C, D):
        for seq in range(1, 10):
            d = state.cert_digest(pid(payer), seq)
            if d is not None:
                item = state.item(d)
                assert item is not None
                t = Certificate.from_bytes(item[1]).transfer.message
                out |= {t.payer, t.payee}
    return out


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_incremental_views_equal_a_recount_from_scratch(data: st.DataObject) -> None:
    pool = list(facts())
    chosen = data.draw(st.lists(st.sampled_from(pool), max_size=len(pool) + 5))
    now = NOW_MS + data.draw(st.integers(-150_000, 150_000))
    state = LedgerState(rule(), POL)
    mirror: dict[str, int] = {}
    for kind, blob in chosen:
        state.ingest_bytes(kind, blob)
        if data.draw(st.booleans()):  # a store folds changes at random commit points
            mirror.update(state.take_changes())
    mirror.update(state.take_changes())
    assert {a: b for a, b in mirror.items() if b} == state.balances()
    assert sum(state.balances().values()) == 0
    # The digest kept in place equals the digest of the set, recomputed.
    assert state.digest() == digest_of(state.fact_ids())
    assert state.state_hash() == state_hash_of(*digest_of(state.fact_ids()))
    assert _views(state, now) == _scratch(state, POL, now)
    # Same set, another order: same everything.
    again = LedgerState(rule(), POL)
    order = list(dict.fromkeys(chosen))
    random.Random(data.draw(st.integers(0, 2**32))).shuffle(order)
    for kind, blob in order:
        again.ingest_bytes(kind, blob)
    assert again.state_hash() == state.state_hash()
    assert _views(again, now) == _views(state, now)
    for p in (A, B, C, D):
        assert again.next_seq(pid(p)) == state.next_seq(pid(p))
        assert again.earned(pid(p), now) == state.earned(pid(p), now)


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=30), st.randoms())
def test_set_digest_is_a_sum_independent_of_order_and_duplicates(
    ids: list[bytes], rnd: random.Random
) -> None:
    total = 0
    seen: set[bytes] = set()
    shuffled = ids + ids[: len(ids) // 2]
    rnd.shuffle(shuffled)
    for fid in shuffled:
        if fid not in seen:
            seen.add(fid)
            total = (total + digest_element(fid)) % (1 << 2048)
    assert (total, len(seen)) == digest_of(ids)
    # Removing a fact (pruning) is a subtraction.
    if ids:
        rest = (total - digest_element(ids[0])) % (1 << 2048)
        assert (rest, len(seen) - 1) == digest_of(seen - {ids[0]})


def test_state_hash_differs_for_different_sets() -> None:
    a = state_hash_of(*digest_of([b"a" * 32]))
    b = state_hash_of(*digest_of([b"b" * 32]))
    both = state_hash_of(*digest_of([b"a" * 32, b"b" * 32]))
    assert len({a, b, both, state_hash_of(*digest_of([]))}) == 4
